"""Device slots: find devices, plan slots, pin a process, record placement, seed."""
