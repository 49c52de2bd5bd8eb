"""Every structured log event name the worker emits, declared once.

Log lines carry topic / partition / offset / messageId / type, never whole messages,
raw e-mail addresses or the API key.
"""

WORKER_STARTING = "worker.starting"
WORKER_READY = "worker.ready"
WORKER_STOPPING = "worker.stopping"
WORKER_STOPPED = "worker.stopped"
CONFIG_INVALID = "config.invalid"
CREDENTIALS_REJECTED = "gist.credentials_rejected"
GIST_UNREACHABLE = "gist.unreachable"
GIST_RETRYING = "gist.retrying"
PARTITIONS_ASSIGNED = "kafka.partitions_assigned"
PARTITIONS_REVOKED = "kafka.partitions_revoked"
COMMIT_FAILED = "kafka.commit_failed"
COMMITTED_UNKNOWN = "kafka.committed_offset_unknown"
SHUTDOWN_ABANDONED = "worker.shutdown_abandoned"
HOUSEKEEPING_FAILED = "worker.housekeeping_failed"
DELIVERY_TASK_FAILED = "worker.delivery_task_failed"
BATCH_COMPLETED = "gist.batch_completed"
BATCH_REJECTED_SPLIT = "gist.batch_rejected_split"
BATCH_LOST = "gist.batch_lost"
BATCH_ERROR_UNMATCHED = "gist.batch_error_unmatched"
ALIAS_NOTHING_TO_MOVE = "gist.alias_nothing_to_move"
DEAD_LETTERED = "message.dead_lettered"
DEAD_LETTER_RETRY = "dlq.produce_retry"
