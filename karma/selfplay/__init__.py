"""MAP self-play rounds: sample with the policy, judge, pair, select, train, evaluate."""
