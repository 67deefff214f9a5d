"""FLOP accounting's command line, `flops.py`: one training step's FLOPs per layer (counted by `qwen_mini.flops`
from the model's own modules), the FLOP ledger of a runs directory (`ledger`), and a study plan's FLOPs stage by
stage (`study.estimate`). It sits above all three, so none of them imports it."""
