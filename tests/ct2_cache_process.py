"""One process loading a model the way the bot starts (`load_chat_model`, runtime
`auto`), for tests/test_ct2_cache.py. It imports everything, says it is ready and
waits for the test's go, so that two of them convert at the same moment; with
`--written` it is held at the moment CTranslate2 has written the converted files
(still in the scratch directory), until `--release` appears or it is killed.
Prints one JSON line: the runtime it ended on, whether it answers, the model's path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.02)


def hold_after_writing(written: Path, release: Path | None) -> None:
    """Hold every conversion once its files are written: a point inside the
    conversion the test can act at (start another process, or kill this one)."""
    from ctranslate2.specs.model_spec import SequenceToSequenceModelSpec

    save = SequenceToSequenceModelSpec.save

    def save_and_hold(self, output_dir: str) -> None:
        save(self, output_dir)
        written.touch()
        if release is None:
            while True:  # until killed
                time.sleep(1)
        wait_for(release)

    SequenceToSequenceModelSpec.save = save_and_hold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--ready", required=True, type=Path)
    parser.add_argument("--go", required=True, type=Path)
    parser.add_argument("--written", type=Path)
    parser.add_argument("--release", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")

    import ctranslate2.converters  # noqa: F401  (imported before the go: both start converting at once)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from bot.config import Settings
    from bot.model import load_chat_model

    if args.written:
        hold_after_writing(args.written, args.release)
    args.ready.touch()
    wait_for(args.go)
    model = load_chat_model(
        Settings(model=args.model, runtime="auto", ct2_dir=args.cache, max_new_tokens=8, num_beams=1)
    )
    [generation] = model.generate([["hello there"]])
    path = getattr(model, "path", None)
    print(json.dumps({"description": model.description, "new_tokens": generation.new_tokens, "path": str(path)}))


if __name__ == "__main__":
    main()
