"""Hosts: facts about the machine, and the accelerator probe."""
