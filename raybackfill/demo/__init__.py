"""`raybackfill demo`: the whole compatible upgrade on built-in (or given) data, from training to report."""
