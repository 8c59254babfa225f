"""How a message names where a run lives, and the command that lists what is there.

A message about a missing run or step says where excp looked and how to list what is
there. A store is named by its URL and listed with ``excp ls --store URL``. A run
reached through an excp service is named by the service and listed with
``excp ls --server URL``: the store behind it (a directory on the server, or the
client's temporary copy of the run's records) means nothing to whoever reads the
message.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """``where``: a phrase for messages (``in file:///data/store``); ``option``: the
    command-line option that reaches it (``--store file:///data/store``)."""

    where: str
    option: str

    @classmethod
    def store(cls, url: str) -> Place:
        return cls(f"in {url}", f"--store {url}")

    @classmethod
    def service(cls, url: str) -> Place:
        return cls(f"on the excp service at {url}", f"--server {url}")

    def listing(self, run: str | None = None) -> str:
        """The command that lists the runs here, or ``run``'s steps."""
        return f"`excp ls {self.option}{f' --run {run}' if run else ''}`"
