"""vqgan: the frame tokenizer (taming-transformers VQGAN), loading TECO's published checkpoints.

  tok = vqgan.load(path)                  # TECO folder (args + checkpoints/checkpoint_<step>) or a VQGAN workdir
  embeddings, codes = tok.encode(video)   # (B,T,H,W,3) in [-1,1] -> (B,T,h,w,D) float32, (B,T,h,w) int32
  frames = tok.decode(codes)              # -> (B,T,H,W,3) in [-1,1]
"""
from vqgan.model import VQGAN, abstract_variables, init_variables
from vqgan.safe_io import UnsafeFileError, load_args, read_msgpack
from vqgan.tokenizer import Tokenizer, load, load_project, load_teco

__all__ = ['VQGAN', 'Tokenizer', 'UnsafeFileError', 'abstract_variables', 'init_variables', 'load',
           'load_args', 'load_project', 'load_teco', 'read_msgpack']
