"""Exceptions that separate a user's mistake from a bug in pflbench."""


class UserError(Exception):
    """A problem the user can fix (bad name, bad config value, missing data).

    The CLI prints its message as one line on stderr and exits with status 2,
    without a traceback.
    """


class TrainingDiverged(Exception):
    """Training produced a non-finite loss; the run is stopped and marked failed."""

    def __init__(self, round_index: int, client: int, loss: float):
        super().__init__(
            f"training diverged: non-finite loss ({loss}) at round {round_index}, client {client};"
            " try a lower train.lr"
        )
        self.round_index = round_index
        self.client = client
        self.loss = loss


class RunStopped(Exception):
    """A run stopped on purpose before its last round (a pruned tuning trial).

    Its MLflow run ends KILLED, not FAILED, with the tag `pflbench.<reason>` = "true".
    """

    def __init__(self, reason: str, round_index: int):
        super().__init__(f"run stopped ({reason}) at round {round_index}")
        self.reason = reason
        self.round_index = round_index


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM): handled like Ctrl-C, the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def error_summary(err: BaseException) -> str:
    """`Type: first line of the message`: one line, for a run's error tag and a failure list."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
