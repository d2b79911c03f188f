"""Generation: sampling strategies, remasking, schedules, cached decoding, sample metrics."""
