/* mutant_record_before_cancel.pml -- record a replacement in the state before the old batch is cancelled. Killed
   between the two, the state names the new batch and no later apply cancels the old one.
   expect: P2
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_RECORD_BEFORE_CANCEL
#include "apply.pml"
