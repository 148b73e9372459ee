"""Change-stream triggers (issue 17): plugins that run when data changes.

A record declares ``triggers`` (validated in :mod:`host.records`, signed in
:mod:`host.trust`); :class:`TriggerEngine` runs them on the hosts of a fleet, at least
once, in order per document key, with a low-watermark checkpoint, retries, dead letters
and a declared policy for lost history. Modules:

* :mod:`~host.triggers.options` — :class:`TriggerOptions`;
* :mod:`~host.triggers.lease` — the lease (CAS on the state document) and rendezvous spread;
* :mod:`~host.triggers.window` — ordering per key and the low-watermark;
* :mod:`~host.triggers.runner` — one trigger's stream, workers, retries, history policy;
* :mod:`~host.triggers.engine` — which triggers this host runs.
"""

from __future__ import annotations

from .engine import TriggerEngine as TriggerEngine
from .lease import deadletters_collection_name as deadletters_collection_name
from .lease import state_collection_name as state_collection_name
from .lease import trigger_id as trigger_id
from .options import TriggerOptions as TriggerOptions

__all__ = (
    "TriggerEngine",
    "TriggerOptions",
    "deadletters_collection_name",
    "state_collection_name",
    "trigger_id",
)
