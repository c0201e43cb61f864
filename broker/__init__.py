"""Tokenwell's Mosquitto configuration (`mosquitto.conf`) and a launcher for it."""

from broker.launcher import BrokerStartError, RunningBroker, start_broker

__all__ = ["BrokerStartError", "RunningBroker", "start_broker"]
