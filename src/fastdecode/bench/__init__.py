"""`fastdecode bench`: speed, exactness and acceptance of every method and of other engines, on one
question set, in one run. One concept per module: questions (what is asked), runner (how it is run
and timed), stats (figures from raw records), report (files written), plots, peers (other engines),
compare (two result folders side by side)."""
