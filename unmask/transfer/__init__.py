"""Transfer learning, an optional feature: binary heads on a pretrained language model, and what uses them.

- `pretrained`: new runs from a pretrained checkpoint (architecture and vocabulary checks, backbone copy, freezing,
  the parameter summary, the resume task check);
- `tasks`: the `replaced_token` and `sequence` objectives of `--switch_to_binary=True`;
- `binary`: replaced-character labels, class-balanced CE, binary metrics (per-class accuracy, F1, AUROC);
- `labeled_text`: JSONL/CSV readers, the fixed stratified split, encoding and padding;
- `classify`: the `unmask classify` command;
- `critic`: the `critic` remasking strategy of `unmask sample`, scored by a per-character classifier.

Nothing outside this package imports it unless a run asks for transfer learning.
"""
