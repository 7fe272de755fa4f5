/* mutant_no_intent_wait.pml -- ignore an intent a killed apply left: record_intent goes straight on to
   create. The killed apply's create, still in flight, lands beside the re-run's own.
   expect: P1
   (tests/test_model.py checks that spin refutes it with exactly this; see README.md) */
#define MUTANT_NO_INTENT_WAIT
#include "apply.pml"
