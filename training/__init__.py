"""retina_fast.training: the reference PyTorch package — trainers, losses, phantom-based data and the
reference sampler that defines correct output. Imports point one way: training -> retina_fast."""
