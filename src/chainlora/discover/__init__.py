"""Stage `discover`: task types from unlabelled instruction data.

    features.py  what a record looks like to the clustering: the request and the answer embedded
                 apart, raw and as a template (rare words masked); records grouped by template
    cluster.py   k-means over the template groups; k chosen by whether clusters differ in their answers
    names.py     a short name per cluster from its distinctive instruction words (class-based TF-IDF)
    report.py    DIR/clusters.html: sizes, names, examples and a 2-D map of the embedding
    pipeline.py  `discover(records) -> Discovery` and writing DIR (records.jsonl, config.yaml, clusters.html)

May import: core, data, library, inference (the classifier selector's sentence encoder).
"""

from chainlora.discover.pipeline import Discovery, discover, write_outputs

__all__ = ["Discovery", "discover", "write_outputs"]
