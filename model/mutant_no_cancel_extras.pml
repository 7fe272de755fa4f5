/* mutant_no_cancel_extras.pml -- drop cancel_duplicates: the keeper is adopted, the other live batches run
   on. At quiet a late create's batch (or the other checkout's) still runs beside the keeper.
   expect: P2
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_NO_CANCEL_EXTRAS
#include "apply.pml"
