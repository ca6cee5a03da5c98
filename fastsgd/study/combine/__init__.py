"""Combining the halves: time to result, what-if projections, noise-scale predictions, the report.

- :mod:`.time_to_result`: steps to result x step time per batch size, read from the two halves' files
- :mod:`.whatif`: time to result projected to other hardware and data-parallel sizes
- :mod:`.noise_prediction`: the critical batch size predicted from the gradient noise scale of one run
- :mod:`.report`: the batch-size report
"""
