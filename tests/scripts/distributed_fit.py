"""Run fit_pas under a multi-process launcher and save the vectors; used by tests/test_distributed.py."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

import pas_peft
from pas_peft.data import MultipleChoiceItem


def main(model_dir: str, items_file: str, output_file: str, scoring: str) -> None:
    state = PartialState()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = {
        name: [MultipleChoiceItem(**row) for row in rows]
        for name, rows in json.loads(Path(items_file).read_text()).items()
    }
    result = pas_peft.fit_pas(
        model, tokenizer, None, splits=splits, scoring=scoring, layers=(1, 2), strengths=(1.0, 4.0),
        show_progress=False, batch_size=3,
    )
    if state.is_main_process:
        torch.save(
            {
                "vectors": result.vectors,
                "sweep": result.sweep,
                "chosen": result.report["chosen"],
                "processes": result.report["processes"],
            },
            output_file,
        )
    # An open gloo group at interpreter exit can abort the process after the work is done.
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
