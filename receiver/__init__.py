"""WebRun Receiver: receives WebRun webhook deliveries durably and turns them into SQL."""

__version__ = "0.1.0"
