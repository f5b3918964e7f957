#include <libs3.h>
