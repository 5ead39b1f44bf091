"""The feature store: a Zarr v3 group of float16 diffusion features, one region per image.

Layout of a store (all chunks hold exactly one image, so images are written independently):

    attrs["segcache"]         schema and provenance (see `StoreSchema`)
    images   (N, S, S, 3)     uint8, the resized input images
    labels   (N, S, S)        int16, label maps; -1 where an image has no labels
    checksums (N, 32)         uint8, sha256 of each image's chunks' CRC32Cs, recorded when written
    done     (N,)             uint8, 1 once every array of that image is written
    native layout:  block_<b> (N, T, C_b, h_b, w_b) float16 — each block at its own resolution,
                    T steps in feature order
    dense layout:   pixels    (N, S, S, D) float16 — upsampled pixel features, chunked in tiles

Beside a local store, `.<name>.claims/<i>`: empty lock files, a writer holds `flock` on image i
while writing it (beside, not inside: the store holds nothing but Zarr).

Pixel features are in the paper's order: step-major, then blocks in the given order. A native
store makes any pixel's D-dimensional vector on demand (`pipeline.store.bilinear`); a dense store
holds them written out. Both are read through `FeatureStore`.

Safety of writing (what a kill, a full disk or a second writer can and cannot do):
- A store is built beside its path and renamed into place: it exists whole or not at all.
- Each image is one region of every array (chunks never span images). Its chunks are written
  first (each to a temporary file, with direct I/O where the disk takes it, then renamed: see
  `chunks`), then its checksum, then its done mark: an image killed halfway stays pending and is
  rewritten on the next run.
- A writer holds an exclusive `flock` on `.<name>.claims/<i>` while it computes and writes image i,
  and re-checks the done mark once it holds it: two processes on one store share the work
  instead of writing the same image twice. The kernel drops the lock when a process dies.
- Readers see only done images; every chunk carries a CRC32C, every image a sha256 of those
  CRC32Cs (so a chunk rewritten by another writer, with a valid CRC32C of its own, is caught by
  `verify_image`), and a chunk missing from a done image is damage, not zeros.
- A store is only ever read as Zarr v3 with the dtypes, shapes and codecs segcache writes:
  nothing in it is unpickled or decoded by a codec segcache did not choose.

Modules: `schema` (what a store holds, its format and errors), `writer` (creating, resuming,
claiming and writing images), `chunks` (encoding and writing chunk files, their CRC32Cs and the
image checksum made of them), `reader` (`FeatureStore`), `locations` (local folders and URLs),
`bilinear` (pixel features from native block tables).
"""
