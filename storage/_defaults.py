"""The store's timing defaults, in a module that imports nothing, so the CLI can show them."""

from __future__ import annotations

HEARTBEAT_INTERVAL_S = 20  # a running trial records a heartbeat this often
GRACE_PERIOD_S = 300  # ...and is declared stale (failed, re-queued) after this long without one
RECONNECT_S = 300.0  # how long an operation keeps retrying a lost store before giving up
