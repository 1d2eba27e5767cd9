#!/usr/bin/env python3
"""Writes a built-in model's card.json from the run that trained it and kshot's own outputs.

    scripts/model_card.py NAME RUN_DIR CARD_FIELDS.json EVAL.json... > crates/kshot/models/NAME/card.json

CARD_FIELDS.json holds the card's text fields (summary, trained_with, training_data, preprocessing)
and `papers` ({"5-way 1-shot": 98.8, ...}); the training time comes from RUN_DIR/metrics.csv, the
calibration from RUN_DIR/calibration.json (`kshot calibrate`), each score from one
`kshot eval --model NAME ... --json` output, and its command is rebuilt from that output.
"""
import csv
import json
import sys


def main():
    name, run, fields_path, *evals = sys.argv[1:]
    fields = json.load(open(fields_path))
    rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
    seconds = float(rows[-1]["seconds"])  # cumulative training time
    episodes = int(rows[-1]["episode"])
    scores = []
    for path in evals:
        e = json.load(open(path))
        setting = f"{e['ways']}-way {e['shots']}-shot"
        command = (f"kshot eval --model {name} --ways {e['ways']} --shots {e['shots']} "
                   f"--queries {e['queries']} --episodes {e['episodes']} --seed {e['seed']} --json")
        scores.append({"setting": setting, "accuracy": e["accuracy"], "ci95": e["ci95"],
                       "episodes": e["episodes"], "paper": fields["papers"].get(setting),
                       "command": command})
    card = {
        "summary": fields["summary"],
        "trained_with": fields["trained_with"],
        "training_time": f"{seconds / 60:.0f} min of training for {episodes} episodes "
                         f"({seconds / episodes:.2f} s each) on {fields['machine']}",
        "training_data": fields["training_data"],
        "preprocessing": fields["preprocessing"],
        "scores": scores,
        "calibration": json.load(open(f"{run}/calibration.json")),
    }
    json.dump(card, sys.stdout, indent=2, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
