"""Two fixes for aiokafka 0.14.0's group membership, installed by ``install()`` before a
consumer starts.

**The join.**
aiokafka sends one JoinGroup *per assignor* it is given, the first naming only the first
assignor, the second the first two, and so on: the loop that sends the request sits
inside the loop over the assignors (aio-libs/aiokafka#1168, open). The worker names two
(the sticky assignor, then aiokafka's round-robin for groups of older workers), so

- every join and rejoin took two rounds: 10 s instead of 5 on Tansu, which answers a
  JoinGroup after half the session timeout, and on Kafka the second request of a member
  whose protocols changed can start the rebalance over;
- the first request names only the sticky assignor, which Kafka refuses in a group of
  older workers naming only round-robin (``INCONSISTENT_GROUP_PROTOCOL``, fatal to
  aiokafka): the fallback the worker names for rolling upgrades could not work.

``perform_group_join`` below is aiokafka 0.14.0's method (Apache License 2.0) with the
request loop moved out of the assignor loop, so one JoinGroup names every assignor, in
the order of preference; nothing else differs. It is installed only over that exact
version's method (``install`` checks the version), so an upgrade of aiokafka falls back
on the library's own, and ``tests/integration/test_kafka_join.py`` says when.

**The leave.** A consumer that stops sends LeaveGroup only when its generation is above
0, the first generation on Kafka, but Tansu numbers a group's first generation 0: a
worker stopped (a rolling restart, a scale-down) in its group's first generation left
nothing, and the others went on waiting for its partitions until its session timed out
(the first step of a three-replica roll took 15.7 s to rejoin instead of 5).
``maybe_leave_group`` below is aiokafka 0.14.0's ``_maybe_leave_group`` deciding on the
member id instead, as the Java client does (``generation.hasMemberId()``): a member the
coordinator gave an id leaves, whatever its generation's number.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiokafka
import aiokafka.errors as Errors
from aiokafka.consumer import group_coordinator
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

log = logging.getLogger(group_coordinator.__name__)

FIXED_VERSIONS = frozenset({"0.14.0"})
"""aiokafka versions whose ``CoordinatorGroupRebalance.perform_group_join`` this module
replaces (the ones that have the bug, and whose method it copies)."""


def install() -> bool:
    """Replace aiokafka's join with the fixed one, once; False when the installed
    aiokafka is not a version this module knows (its own method stays)."""
    rebalance = group_coordinator.CoordinatorGroupRebalance
    coordinator = group_coordinator.GroupCoordinator
    if rebalance.perform_group_join is perform_group_join:
        return True
    if aiokafka.__version__ not in FIXED_VERSIONS:
        return False
    rebalance.perform_group_join = perform_group_join
    coordinator._maybe_leave_group = maybe_leave_group
    return True


async def maybe_leave_group(self: Any) -> None:
    """Leave the group (a best effort: one request, no retry), then forget the member id
    and generation. aiokafka 0.14.0's method but for its first condition, which was
    ``self.generation > 0`` (see the module docstring)."""
    if self.member_id != JoinGroupRequest.UNKNOWN_MEMBER_ID and self._group_instance_id is None:
        # this is a minimal effort attempt to leave the group. we do not
        # attempt any resending if the request fails or times out.
        # Note: do not send this leave request if we are running in static
        # partition assignment mode (when group_instance_id has been set).
        request = LeaveGroupRequest(self.group_id, self.member_id)
        try:
            await self._send_req(request)
        except Errors.KafkaError as err:
            log.error("LeaveGroup request failed: %s", err)
        else:
            log.info("LeaveGroup request succeeded")
    self.reset_generation()


async def perform_group_join(self: Any) -> Any:
    """Join the group and return the assignment for the next generation.

    This function handles both JoinGroup and SyncGroup, delegating to
    _perform_assignment() if elected as leader by the coordinator node.

    Returns encoded-bytes assignment returned from the group leader
    """
    # send a join group request to the coordinator
    log.info("(Re-)joining group %s", self.group_id)

    topics = self._subscription.topics
    metadata_list = []
    for assignor in self._assignors:
        metadata = assignor.metadata(topics)
        if not isinstance(metadata, bytes):
            metadata = metadata.encode()
        group_protocol = (assignor.name, metadata)
        metadata_list.append(group_protocol)
    # for KIP-394 we may have to send a second join request
    try_join = True
    while try_join:
        try_join = False

        request = JoinGroupRequest(
            self.group_id,
            self._session_timeout_ms,
            self._rebalance_timeout_ms,
            self._coordinator.member_id,
            self._coordinator._group_instance_id,
            ConsumerProtocol.PROTOCOL_TYPE,
            metadata_list,
        )

        # create the request for the coordinator
        log.debug(
            "Sending JoinGroup (%s) to coordinator %s",
            request,
            self.coordinator_id,
        )
        try:
            response = await self._coordinator._send_req(request)
        except Errors.KafkaError:
            # Return right away. It's a connection error, so backoff will be
            # handled by coordinator lookup
            return None
        if not self._subscription.active:
            # Subscription changed. Ignore response and restart group join
            return None

        error_type = Errors.for_code(response.error_code)

        if error_type is Errors.MemberIdRequired:
            self._coordinator.member_id = response.member_id
            try_join = True

    if error_type is Errors.NoError:
        log.debug("Join group response %s", response)
        self._coordinator.member_id = response.member_id
        self._coordinator.generation = response.generation_id
        protocol = response.group_protocol
        log.info(
            "Joined group '%s' (generation %s) with member_id %s",
            self.group_id,
            response.generation_id,
            response.member_id,
        )

        if response.leader_id == response.member_id:
            log.info(
                "Elected group leader -- performing partition assignments using %s",
                protocol,
            )
            assignment_bytes = await self._on_join_leader(response)
        else:
            assignment_bytes = await self._on_join_follower()

        if assignment_bytes is None:
            return None
        return (protocol, assignment_bytes)
    elif error_type is Errors.GroupLoadInProgressError:
        # Backoff and retry
        log.debug(
            "Attempt to join group %s rejected since coordinator %s is loading the group.",
            self.group_id,
            self.coordinator_id,
        )
        await asyncio.sleep(self._retry_backoff_ms / 1000)
    elif error_type is Errors.UnknownMemberIdError:
        # reset the member id and retry immediately
        self._coordinator.reset_generation()
        log.debug(
            "Attempt to join group %s failed due to unknown member id",
            self.group_id,
        )
    elif error_type in (
        Errors.GroupCoordinatorNotAvailableError,
        Errors.NotCoordinatorForGroupError,
    ):
        # Coordinator changed we should be able to find it immediately
        err = error_type()
        self._coordinator.coordinator_dead()
        log.debug(
            "Attempt to join group %s failed due to obsolete coordinator information: %s",
            self.group_id,
            err,
        )
    elif error_type in (
        Errors.InconsistentGroupProtocolError,
        Errors.InvalidSessionTimeoutError,
        Errors.InvalidGroupIdError,
    ):
        err = error_type()
        log.error("Attempt to join group failed due to fatal error: %s", err)
        raise err
    elif error_type is Errors.GroupAuthorizationFailedError:
        raise error_type(self.group_id)
    else:
        err = error_type()
        log.error("Unexpected error in join group '%s' response: %s", self.group_id, err)
        raise Errors.KafkaError(repr(err))
    return None
