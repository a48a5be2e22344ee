"""The worker (`vlbatch run` and `watch`): claiming jobs, answering units, slots, heartbeats, operator control."""
