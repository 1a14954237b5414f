import os

import s3fs

from cosyvoice.corpus import prepare_libritts
from cosyvoice.corpus.checks import check_data_dir


def test_s3_source_and_destination_give_the_same_manifest_as_local(broken_corpus, s3_bucket, s3_server, tmp_path):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    local_src = os.path.join(broken_corpus, "dev-clean")
    fs.put(local_src, f"{s3_bucket}/LibriTTS/", recursive=True)
    s3_src, s3_dest = f"s3://{s3_bucket}/LibriTTS/dev-clean", f"s3://{s3_bucket}/out/manifest/dev-clean"

    remote = prepare_libritts(s3_src, s3_dest, utts_per_shard=5, num_workers=4)
    local = prepare_libritts(local_src, str(tmp_path / "m"), utts_per_shard=5)

    assert remote.files_found == local.files_found == 23
    assert remote.quarantined_by_reason == local.quarantined_by_reason
    assert remote.shard_keys == local.shard_keys
    for name in ("wav.scp", "text", "utt2spk", "spk2utt", "utt2dur", "shards.json", "quarantine.tsv", "long_audio.tsv"):
        theirs = fs.cat_file(f"{s3_bucket}/out/manifest/dev-clean/{name}").decode()
        ours = (tmp_path / "m" / name).read_text()
        assert theirs == ours.replace(local_src, s3_src), name
    assert all(o.passed for o in check_data_dir(s3_dest).values())
    again = prepare_libritts(s3_src, s3_dest, utts_per_shard=5)
    assert not any(again.files_written.values())
