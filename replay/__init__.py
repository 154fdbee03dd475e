"""spikevaediff.replay"""
