/* liveness.pml -- P3 as a liveness property: under weak fairness every run reaches quiet with
   a live or completed batch for the spec, and stays there. An LTL claim needs pan's acceptance
   search, which the default options leave out:
     spin -a liveness.pml && gcc -O2 -o pan pan.c && ./pan -a -f      # expect "errors: 0"
   apply.pml checks the same thing as an assertion at quiet with pan's default options; see README.md. */
#include "apply.pml"

ltl p3 { <> [] (quiet && P3_HAS_BATCH) }
