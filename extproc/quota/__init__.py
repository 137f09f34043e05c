"""Per-team quotas: limits over calendar windows, reserved before a request, settled after."""
