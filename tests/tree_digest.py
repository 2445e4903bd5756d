"""One hash of a folder's file names and bytes: "the workdir is untouched" in tests."""
import hashlib
import os


def tree_digest(path) -> str:
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      digest.update(name.encode())
      with open(os.path.join(root, name), "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()
