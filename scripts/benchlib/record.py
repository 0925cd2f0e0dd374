"""What a suite measured, repetition by repetition, and where it is while it runs.

A suite announces each run with `begin(config, rep, reps)` (a progress line with an ETA from the
runs done so far and `plan`), and the primitives that run a VM hand their raw numbers to `raw`,
which files them under the configuration being run. The JSON results carry all of it."""
import sys
import time

_state = {}


def start_suite(name):
    _state.clear()
    _state.update(suite=name, started=time.monotonic(), planned=0, done=0, config=None, rep=0, raw=[])


def plan(runs):
    """The suite will make `runs` more runs (for the ETA)."""
    _state["planned"] = _state.get("planned", 0) + runs


def begin(config, rep, reps):
    """A run of `config` starts: repetition `rep` (0-based) of `reps`."""
    if not _state:
        return
    done, planned = _state["done"], _state["planned"]
    spent = time.monotonic() - _state["started"]
    eta = f", about {spent / done * (planned - done):.0f} s left in the suite" if done and planned > done else ""
    print(f"{_state['suite']}: {config}, run {rep + 1}/{reps} ({done + 1}/{planned or '?'}{eta})",
          file=sys.stderr, flush=True)
    _state["done"] = done + 1
    _state["config"] = config
    _state["rep"] = rep


def raw(numbers, command=None):
    """One repetition's raw numbers (a dict of plain values), filed under the current run."""
    if not _state:
        return
    _state["raw"].append({"config": _state["config"], "rep": _state["rep"], "command": command,
                          "numbers": numbers})


def repetitions():
    return list(_state.get("raw", []))
