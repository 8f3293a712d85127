"""Fault runs against a real `loraplex serve` process: soak, crash, disk full, corruption and
fuzzing (one file each; harness.py and client.py are what they share). tests/faults/ runs a
short version of each; `python -m loraplex.faults <kind>` the long ones (see __main__.py)."""
