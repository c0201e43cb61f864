"""Simulated devices: they stand in for hardware in the tests, the benchmark and the demo.

* :mod:`device_sim.device`: one device's meters, counters, reports and control (pure).
* :mod:`device_sim.faults`: seeded fault injection on the outgoing reports (pure).
* :mod:`device_sim.store`: the fleet's state in one atomically replaced JSON file.
* :mod:`device_sim.fleet`: many devices over one MQTT connection, on asyncio.
* :mod:`device_sim.cli`: ``tokenwell sim``.
"""
