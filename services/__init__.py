"""spikevaediff.services"""
