"""Video datasets: TECO's raw npz / mp4 folders and encoded TFDS folders behind one loader.

    ds = open_dataset(path, 'train', seq_len=300, batch_size=16)
    ds.info            # DatasetInfo(format, kind, num_videos, video_length, frame_shape | code_shape, ...)
    for batch in ds:   # {'frames' or 'codes', 'actions', 'valid', 'index', 'start'} numpy arrays
        codes = batch_codes(batch, tokenizer)   # frames encoded, codes as stored
    check_tokenizer(ds.info, tokenizer)          # codes made by another tokenizer are refused

`TfdsWriter` writes encoded datasets in the TFDS layout the same loader reads.
"""
from teco_ssm.data.formats import DataError, DatasetInfo
from teco_ssm.data.pipeline import Dataset, batch_codes, check_tokenizer, inspect_dataset, open_dataset
from teco_ssm.data.tfds_folder import TfdsWriter

__all__ = ['DataError', 'Dataset', 'DatasetInfo', 'TfdsWriter', 'batch_codes', 'check_tokenizer', 'inspect_dataset',
           'open_dataset']
