/* mutant_no_settle.pml -- drop the settling wait: a create whose answer was lost is looked for, and
   sent again at once if it is not there yet. An ordinary delayed create then lands after the
   second one: two live batches.
   expect: P1
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_NO_SETTLE
#include "apply.pml"
