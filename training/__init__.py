"""spikevaediff.training"""
