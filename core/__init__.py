"""spikevaediff.core"""
