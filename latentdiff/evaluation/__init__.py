"""Evaluation: the protocols of the paper's tables and of the shapes demo, each with its command line.

  references     image sets and reference splits (DIR / .npz / tfds:NAME/SPLIT) and the statistics files
  fid            FID and Inception Score of two image sets             (latentdiff eval fid)
  txt2img        the text-to-image table protocol, resumable shards     (latentdiff eval txt2img)
  alignment      caption alignment on the shapes dataset                (latentdiff eval alignment)
  shapes_grader  the analytic grader of shapes images against their captions

The maths (Inception features, Fréchet distance, IS, PSNR) is latentdiff/metrics.py.
"""
