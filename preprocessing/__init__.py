"""Raw books to TFRecord shards (Apache Beam), plus the data contract the trainer reads."""
