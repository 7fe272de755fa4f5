/* mutant_trust_404.pml -- trust a 404: retrieve_batch takes one 404 of the recorded batch as proof
   that it is gone. A replace then never cancels the old batch, which runs on beside the new one.
   expect: P2
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_TRUST_404
#include "apply.pml"
