"""The daemon: mail sources, parsing, triage, routing, teachers, actions, scheduler, review."""
