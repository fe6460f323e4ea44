"""Stage parse_pickle: the user's captions file -> captions table (parquet) + data report (json)."""
from captioning import files, layout
from captioning.captions import load_captions
from captioning.captions.report import near_match_hint
from captioning.demo import match_params
from captioning.errors import run_stage
from captioning.params import read_params


def main() -> None:
    params = read_params("data.captions", "data.images", "data.allow_pandas_pickle", "data.max_skipped_fraction",
                         "demo")
    data = params["data"]
    # The demo data is no stage's output: remade here when the demo params change (dvc exp run -S demo.x=...)
    print(match_params(data["captions"], **params["demo"]))
    table, report = load_captions(data["captions"], data["images"], allow_pandas_pickle=data["allow_pandas_pickle"],
                                  max_skipped_fraction=data["max_skipped_fraction"])
    files.write_parquet(layout.CAPTIONS_TABLE, table)
    files.write_lines(layout.IMAGE_LIST, sorted(table["image"].unique()))
    files.write_json(layout.PARSE_REPORT, report)
    print(f"{report['lines_read']} lines read, {report['rows_kept']} captions kept for "
          f"{report['images_found']} images; {report['skipped_count']} lines skipped, "
          f"{report['missing_images']['captions_excluded']} captions of {report['missing_images']['count']} "
          f"missing images excluded (details: {layout.PARSE_REPORT})")
    if hint := near_match_hint(report):
        print(f"warning: {hint}")


if __name__ == "__main__":
    run_stage(main, __doc__)
