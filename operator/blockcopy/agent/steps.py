"""What one step of a follower sees and records (``agent.follower``): its observation, and
the outcome the recorder writes. Data only, apart from the follower so that it stays about
the steps themselves."""

from __future__ import annotations

import dataclasses
from typing import Any

from blockcopy.agent.starter import StartSettings
from blockcopy.core import destinations
from blockcopy.core.progress import Estimate
from blockcopy.core.reconcile import Decision
from blockcopy.model.api import BlockCopySpec
from blockcopy.model.observation import DiskState, GroupView, LayersView


@dataclasses.dataclass(frozen=True)
class FollowSettings:
    start: StartSettings
    poll_interval: float = 5.0  # fallback look when no event arrives


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one step saw: the disk, and while a job runs, the chain move's lower layers, the
    disk group (listed from the API server when a pivot is due) and the progress estimate."""

    disk: DiskState
    layers: LayersView = dataclasses.field(default_factory=LayersView)
    group: GroupView | None = None
    estimate: Estimate | None = None
    dest: destinations.DestCheck | None = None  # looked at before a pivot (and first look)


@dataclasses.dataclass
class Outcome:
    """What a step records: the decision as acted on, and what came with it."""

    decision: Decision
    disk: DiskState | None
    conditions: list[dict[str, Any]]
    fields: dict[str, Any] | None = None
    started: dict[str, Any] | None = None
    refused: bool = False  # libvirt refused the action: back off, stay in the phase
    intent: bool = False  # wait until it is stored (a plan precedes its files)
    estimate: Estimate | None = None  # the progress estimate, for the metrics
    spec: BlockCopySpec | None = None  # as acted on (Ready depends on what it asks)
