/* mutant_liveness_wait_for_landing.pml -- settle waits until every create in flight has landed instead of
   waiting the client timeout. A create that lands only after the settling window never lands
   while its sender waits, so the apply never ends: the liveness claim p3 fails (pan -a).
   expect: acceptance cycle
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_WAIT_FOR_LANDING
#include "liveness.pml"
