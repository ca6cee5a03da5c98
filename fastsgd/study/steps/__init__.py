"""The algorithmic half: training steps to reach a goal against batch size.

- :mod:`.runner`: a whole study (search over hyperparameters per batch size, resumable)
- :mod:`.trials`: training trials, several at once (vmapped) per batch size
- :mod:`.search`: the hyperparameter search spaces and samplers
- :mod:`.storage`: the study's trial store (optuna)
- :mod:`.curves`: every evaluation of every trial as text (curves.csv.gz), read back for re-analysis
- :mod:`.analysis`: steps to result per batch size and the fitted S(B) = S_min + E_min / B
- :mod:`.batch_science`: export and import in Shallue et al.'s batch_science layout
"""
