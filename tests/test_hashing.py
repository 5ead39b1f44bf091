import hashlib

from pipeline.runtime.hashing import file_sha256


def test_file_sha256_streams_large_files(tmp_path):
    path = tmp_path / "blob.bin"
    content = bytes(range(256)) * 9000  # 2.2 MiB: several 1 MiB reads
    path.write_bytes(content)
    assert file_sha256(path) == hashlib.sha256(content).hexdigest()
