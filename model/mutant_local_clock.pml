/* mutant_local_clock.pml -- trust the local clock: find_batches stops its walk at local_now - MARGIN,
   compared with the server's created_at. With the server clock lagging by more than the margin,
   look_for misses a create whose answer was lost and the applier sends a second one.
   expect: P1
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_LOCAL_CLOCK
#include "apply.pml"
