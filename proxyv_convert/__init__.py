"""proxyv: convert LLaVA-family checkpoints into ProxyV models.

The pipeline, one module per stage (each is one library call behind one `proxyv` command in `cli.py`):
    convert.py   a checkpoint (folder or Hub id, `source.py`) -> a ProxyV model folder
    distill.py   train the ProxyV modules against the same weights with ProxyV off
    evaluate.py  exact-match answers, and agreement with the original model
    bench.py     prefill and decode, ProxyV against off, side by side
    push.py      check the folder, publish it with its model card (`card.py`)
    run.py       all of the above from one recipe
What they share, one home each:
    families.py      one entry per model family (llava, llava_next, llava_onevision, llava_next_video): classes,
                     key rules, inputs, card wording
    remote/          the ProxyV model code, copied byte for byte into every converted checkpoint
    config.py        the recipe schema: every default of the CLI, the recipes and a folder's recipe.yaml
    data.py          the one data loader (`--data` of every command); batching.py makes model inputs from it
    model_folder.py  what a model folder holds and how it loads
"""

__version__ = "0.1.0"
