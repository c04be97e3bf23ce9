"""The demo data's splits: disjoint by seed base and by body (a light module: no torch, no data).

``train``, ``val`` (to choose between runs) and ``test`` draw different deformed bodies and lesions of
the training cases; ``report`` uses a case never used in training.
"""
SPLITS = {"train": 0, "test": 1_000_003, "report": 2_000_003, "val": 3_000_003}   # each split's seed base
TRAIN_CASES = ("abdomen_ct", "chest_aorta_ct")
REPORT_CASES = ("dicom_ct",)
